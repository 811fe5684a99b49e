// The JSON APIs, with the admin key from sessionStorage sent as a Bearer header.

const KEY = "lorafleet.adminKey";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, { method = "GET", body, signal, key } = {}) {
  const headers = { authorization: `Bearer ${key ?? auth.get() ?? ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server did not answer (${err.message})`, "network");
  }
  let data = null;
  try { data = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const e = data && data.error;
    if (response.status === 401 && key === undefined) window.dispatchEvent(new CustomEvent("lf:unauthorized"));
    throw new ApiError(response.status, (e && e.message) || `HTTP ${response.status}`, e && e.code);
  }
  return data;
}

/** "t/u/a" -> "t/u/a" with each segment URL-encoded (names are already restricted, this is belt and braces). */
export const refPath = (ref) => ref.split("/").map(encodeURIComponent).join("/");

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== "") q.set(k, v);
  const str = q.toString();
  return str ? `?${str}` : "";
}
