// Training jobs: queued / running / finished, with progress and the loss curve of the selected job.
import { api, ApiError, query, refPath } from "./api.js";
import { confirmAction, fmtNum, fmtPct, fmtTime, h, toast } from "./dom.js";
import { lineChart } from "./charts.js";

const STATES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 25;
const POLL_MS = 3000;

export function jobsView(selected) {
  const controller = new AbortController();
  const signal = controller.signal;
  let stateFilter = "";
  let befores = [null];
  let page = 0;
  const tbody = h("tbody", { id: "job-rows" });
  const pager = h("div", { class: "pager" });
  const detail = h("section", { class: "card", id: "job-detail" }, h("p", { class: "muted" }, "select a job to see its loss curve"));
  const tabs = h("div", { class: "tabs" }, STATES.map((st) => h("button", { class: st === stateFilter ? "tab active" : "tab",
    dataset: { state: st || "all" }, onclick: (ev) => {
      stateFilter = st;
      befores = [null];
      page = 0;
      tabs.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b === ev.currentTarget));
      loadList();
    } }, st || "all")));
  const el = h("div", { class: "jobs" },
    h("section", { class: "card" }, h("h2", {}, "training jobs"), tabs,
      h("table", { class: "list" }, h("thead", {}, h("tr", {},
        ["job", "adapter", "state", "method", "progress", "loss", "created", "finished"].map((c) => h("th", {}, c)))), tbody),
      pager),
    detail);

  async function loadList() {
    let data;
    try {
      data = await api(`/v1/jobs${query({ state: stateFilter, limit: PAGE, before: befores[page] })}`, { signal });
    } catch (e) {
      if (e.name !== "AbortError") tbody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "error" }, e.message)));
      return;
    }
    const jobs = data.data;
    befores[page + 1] = jobs.length === PAGE ? jobs[jobs.length - 1].id : null;
    tbody.replaceChildren(...jobs.map((j) => h("tr", { class: j.id === selected ? "selected" : "", dataset: { job: j.id } },
      h("td", {}, h("a", { href: `#/jobs/${j.id}` }, `#${j.id}`)),
      h("td", {}, h("a", { href: `#/adapter/${refPath(j.ref)}` }, j.ref)),
      h("td", {}, h("span", { class: `chip state-${j.state}` }, j.state)),
      h("td", {}, j.method),
      h("td", {}, h("span", { class: "bar" }, h("i", { style: { width: fmtPct(j.progress, 1) } })),
        h("span", { class: "small muted" }, ` ${j.step}/${j.total_steps}`)),
      h("td", {}, fmtNum(j.loss, 4)),
      h("td", { class: "muted" }, fmtTime(j.created_at)), h("td", { class: "muted" }, fmtTime(j.finished_at)))));
    if (!jobs.length) tbody.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "no jobs")));
    pager.replaceChildren(
      h("button", { disabled: page === 0, onclick: () => { page--; loadList(); } }, "← newer"),
      h("button", { disabled: !befores[page + 1], onclick: () => { page++; loadList(); } }, "older →"));
  }

  async function loadDetail() {
    if (!selected) return;
    let j;
    try {
      j = await api(`/v1/jobs/${selected}`, { signal });
    } catch (e) {
      if (e.name !== "AbortError") detail.replaceChildren(h("p", { class: "error" }, e.message));
      return;
    }
    const active = j.state === "queued" || j.state === "running";
    detail.replaceChildren(...[
      h("h3", {}, `job #${j.id} · ${j.ref} · `, h("span", { class: `chip state-${j.state}` }, j.state)),
      h("p", { class: "muted" }, `${j.method} · step ${j.step}/${j.total_steps} (${fmtPct(j.progress, 1)}) · `,
        `${j.example_count} examples · rank ${j.spec.rank} · lr ${j.config.lr} · attempts ${j.attempts}`,
        j.result_number ? ` · produced revision #${j.result_number}` : ""),
      j.error ? h("p", { class: "error" }, j.error) : null,
      lineChart([{ name: "loss", points: (j.losses || []).map((l, i) => [i + 1, l]) }],
        { title: "training loss per step", width: 640, height: 220, xLabel: "step", integerX: true }),
      active ? h("button", { class: "danger", id: "cancel-job", onclick: async () => {
        const c = await confirmAction(`Cancel job #${j.id}?`, `${j.ref}: training stops; no revision is committed.`,
          { reason: false, okLabel: "Cancel the job", danger: true });
        if (!c.ok) return;
        try {
          await api(`/v1/jobs/${j.id}`, { method: "DELETE" });
          toast(`job #${j.id} cancelled`, "ok");
        } catch (e) { toast(e instanceof ApiError ? e.message : String(e), "error"); }
        refresh();
      } }, "cancel job") : null].filter(Boolean));
  }

  function refresh() {
    loadList();
    loadDetail();
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return { el, cleanup: () => { clearInterval(timer); controller.abort(); } };
}
