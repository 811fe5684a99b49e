// Playground: one prompt, several users' adapters and the base side by side, through /v1/chat/completions.
import { api, query } from "./api.js";
import { fmtNum, h } from "./dom.js";
import { state } from "./app.js";

export function playgroundView(params) {
  const models = (params.get("models") || "").split(",").map((m) => m.trim()).filter(Boolean);
  const chips = h("div", { class: "chips", id: "pg-models" });
  const suggest = h("datalist", { id: "pg-suggest" });
  const pick = h("input", { id: "pg-add", list: "pg-suggest", placeholder: "tenant/user/adapter (prefix search)", autocomplete: "off", spellcheck: "false" });
  const withBase = h("input", { type: "checkbox", id: "pg-base", checked: true });
  const prompt = h("textarea", { id: "pg-prompt", rows: 3, maxlength: 20000 }, "Can you recommend something to do on a rainy weekend?");
  const maxTokens = h("input", { id: "pg-max", type: "number", min: 1, max: 1024, value: 48 });
  const temperature = h("input", { id: "pg-temp", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const out = h("div", { class: "answers", id: "pg-answers" });
  const err = h("p", { class: "error", id: "pg-error" });

  function renderChips() {
    chips.replaceChildren(...models.map((m) => h("span", { class: "chip model" }, m, h("button", { class: "link", title: `remove ${m}`,
      onclick: () => { models.splice(models.indexOf(m), 1); renderChips(); } }, "×"))));
  }
  function add() {
    const m = pick.value.trim();
    if (!m) return;
    if (!models.includes(m)) models.push(m);
    pick.value = "";
    renderChips();
  }
  let seq = 0;
  pick.addEventListener("input", async () => {
    const prefix = pick.value.trim();
    const mine = ++seq;
    if (prefix.length < 2) return;
    try {
      const data = await api(`/v1/adapters${query({ prefix, limit: 10 })}`);
      if (mine === seq) suggest.replaceChildren(...data.data.map((a) => h("option", { value: a.ref })));
    } catch { /* a partial prefix may be invalid while typing */ }
  });
  pick.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); add(); } });

  async function run() {
    err.textContent = "";
    let whoami;
    try { [whoami] = await state.ready; } catch { return; }
    const baseName = whoami.base;
    const targets = [...models, ...(withBase.checked ? [baseName] : [])];
    if (!targets.length) {
      err.textContent = "add at least one adapter, or keep the base";
      return;
    }
    const text = prompt.value.trim();
    if (!text) {
      err.textContent = "write a prompt first";
      return;
    }
    const body = { messages: [{ role: "user", content: text }], max_tokens: Number(maxTokens.value) || 48,
      temperature: Number(temperature.value) || 0, seed: 0 };
    out.replaceChildren(...targets.map((m) => h("div", { class: "answer card", dataset: { model: m } },
      h("h4", {}, m === baseName ? `${m} (base, no adapter)` : m), h("p", { class: "text muted" }, "…"), h("p", { class: "meta muted small" }))));
    await Promise.all(targets.map(async (m, i) => {
      const card = out.children[i];
      const t0 = performance.now();
      try {
        const r = await api("/v1/chat/completions", { method: "POST", body: { ...body, model: m } });
        card.querySelector(".text").textContent = r.choices[0].message.content;
        card.querySelector(".text").classList.remove("muted");
        card.querySelector(".meta").textContent = `${r.lorafleet.revision || "base"} · ${fmtNum(r.usage.completion_tokens)} tokens · ${fmtNum(performance.now() - t0)} ms`;
        card.dataset.done = "ok";
      } catch (e) {
        card.querySelector(".text").replaceChildren(h("span", { class: "error" }, e.message));
        card.dataset.done = "error";
      }
    }));
    out.dataset.done = "1";
  }

  renderChips();
  const el = h("div", { class: "playground" },
    h("section", { class: "card" }, h("h2", {}, "playground"),
      h("p", { class: "muted" }, "The same prompt through several users' adapters and the base, side by side (the OpenAI chat route, batched by the engine)."),
      h("div", { class: "toolbar" }, pick, suggest, h("button", { id: "pg-add-btn", onclick: add }, "add"),
        h("label", {}, withBase, " base")),
      chips, prompt,
      h("div", { class: "toolbar" }, h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temperature),
        h("button", { class: "primary", id: "pg-run", onclick: run }, "send to all")), err),
    out);
  return { el };
}
