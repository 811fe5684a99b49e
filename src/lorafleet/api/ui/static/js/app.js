// The dashboard shell: sign-in with an admin key (kept in sessionStorage), hash routing between the views.
import { api, ApiError, auth } from "./api.js";
import { $, $$, h } from "./dom.js";
import { adapterView } from "./adapter.js";
import { jobsView } from "./jobs.js";
import { overviewView } from "./overview.js";
import { playgroundView } from "./playground.js";

const ROUTES = [
  [/^#?\/?(?:\?(.*))?$/, "overview", (m) => overviewView(new URLSearchParams(m[1] || ""))],
  [/^#\/adapter\/([^/?]+)\/([^/?]+)\/([^/?]+)$/, "overview", (m) => adapterView(m.slice(1, 4).map(decodeURIComponent).join("/"))],
  [/^#\/jobs(?:\/(\d+))?$/, "jobs", (m) => jobsView(m[1] ? Number(m[1]) : null)],
  [/^#\/playground(?:\?(.*))?$/, "playground", (m) => playgroundView(new URLSearchParams(m[1] || ""))],
];

let cleanup = null;
export const state = { capabilities: null, whoami: null, ready: null };

function loginView(message = "") {
  $("#nav").hidden = true;
  $("#who").replaceChildren();
  const input = h("input", { id: "login-key", type: "password", autocomplete: "off", placeholder: "lf-admin-…",
    required: true, minlength: 8 });
  const err = h("p", { class: "error", id: "login-error" }, message);
  const form = h("form", { class: "login card", id: "login-form" },
    h("h2", {}, "Sign in"),
    h("p", { class: "muted" }, "The dashboard needs an admin key (", h("code", {}, "lorafleet keys create --admin"),
      ", or the server's $LORAFLEET_ADMIN_KEY). It is kept in this tab's sessionStorage only."),
    h("label", {}, "admin key ", input), h("button", { type: "submit", class: "primary" }, "Sign in"), err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "checking…";
    try {
      await api("/ui/api/whoami", { key: input.value.trim() });
      auth.set(input.value.trim());
      await start();
    } catch (e) {
      err.textContent = e instanceof ApiError ? e.message : String(e);
    }
  });
  $("#main").replaceChildren(form);
  input.focus();
}

async function render() {
  if (cleanup) { cleanup(); cleanup = null; }
  const hash = location.hash || "#/";
  for (const [re, nav, view] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    $$("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === nav));
    const main = $("#main");
    try {
      const result = view(m);
      main.replaceChildren(result.el);
      cleanup = result.cleanup || null;
    } catch (e) {
      main.replaceChildren(h("p", { class: "error" }, String(e)));
    }
    return;
  }
  $("#main").replaceChildren(h("p", { class: "error" }, `no such page: ${hash}`), h("a", { href: "#/" }, "overview"));
}

async function start() {
  if (!auth.get()) return loginView();
  // Render at once (the overview's first query runs in parallel); the key check answers meanwhile.
  state.ready = Promise.all([api("/ui/api/whoami"), api("/ui/api/capabilities")]);
  $("#nav").hidden = false;
  render();
  try {
    [state.whoami, state.capabilities] = await state.ready;
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
      auth.clear();
      return loginView(e.message);
    }
    $("#main").replaceChildren(h("p", { class: "error" }, e.message));
    return;
  }
  const w = state.whoami;
  $("#who").replaceChildren(
    h("span", { class: "muted" }, `${w.base} · v${w.version} · key ${w.key.prefix}… `),
    h("button", { id: "signout", class: "link", onclick: () => { auth.clear(); loginView("signed out"); } }, "sign out"));
}

window.addEventListener("hashchange", () => auth.get() && state.ready && render());
window.addEventListener("lf:unauthorized", () => { auth.clear(); loginView("the key was refused (revoked?)"); });
start();
