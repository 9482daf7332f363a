// The HTTP API as the page uses it: the bearer token, errors in words, pages of results, thumbnails.
//
// The token lives in sessionStorage (this tab only) and travels in the Authorization header, never in a
// URL: thumbnails are fetched with the header and shown through blob: URLs.

const TOKEN_KEY = "clipdex.token";
export const PAGE_SIZE = 24;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  // askToken(message, verify) shows the token prompt and resolves once verify(token) accepted one.
  constructor(askToken) {
    this.askToken = askToken;
    this.token = sessionStorage.getItem(TOKEN_KEY);
    this.asking = null;
  }

  get wantsToken() {
    return document.documentElement.dataset.auth === "bearer";
  }

  // Before the first call: ask for the token once, when the server wants one and the tab has none.
  async ready() {
    if (this.wantsToken && !this.token) await this.prompt("");
  }

  prompt(message) {
    // Many calls can be refused at once (a grid of thumbnails): they all wait for the same prompt.
    if (!this.asking) {
      this.asking = this.askToken(message, (token) => this.tryToken(token)).finally(() => {
        this.asking = null;
      });
    }
    return this.asking;
  }

  // true when the server accepts the token (then it is kept), false when it refuses it.
  async tryToken(token) {
    const response = await this.fetch("/status", { headers: { authorization: `Bearer ${token}` } });
    if (response.status === 401) return false;
    this.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    return true;
  }

  async fetch(path, init = {}) {
    try {
      return await fetch(path, { ...init, credentials: "omit" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `Cannot reach the clipdex server at ${location.host}. Is it still running?`);
    }
  }

  // GET (or POST with a body) `path`; the JSON answer, or a Blob with {blob: true}. A refused token
  // brings the prompt back and the call is tried again with the new one.
  async call(path, { method = "GET", body, blob = false, signal } = {}) {
    await this.ready();
    for (;;) {
      const headers = this.token ? { authorization: `Bearer ${this.token}` } : {};
      const response = await this.fetch(path, { method, body, headers, signal });
      if (response.status === 401) {
        const had = this.token;
        this.token = null;
        sessionStorage.removeItem(TOKEN_KEY);
        await this.prompt(had ? "The server no longer accepts the saved token. Enter it again." : "");
        continue;
      }
      if (!response.ok) throw new ApiError(response.status, await errorText(response));
      return blob ? response.blob() : response.json();
    }
  }

  status() {
    return this.call("/status");
  }

  deadLetters(limit) {
    return this.call(`/dead-letters?limit=${limit}`);
  }

  item(id) {
    return this.call(`/items/${encodeURIComponent(id)}`);
  }

  thumbnail(id, signal) {
    return this.call(`/items/${encodeURIComponent(id)}/thumbnail`, { blob: true, signal });
  }

  // The pages of one search. `what` is {query}, {like: item id} or {file: File}; `filters` is
  // {source, min_score, metadata: [[key, value], ...]}.
  pages(what, filters) {
    return new Pager((cursor) => {
      const params = searchParams(filters, PAGE_SIZE);
      if (cursor) params.set("cursor", cursor);
      if (what.query !== undefined) {
        params.set("query", what.query);
        return this.call(`/search?${params}`);
      }
      if (what.like !== undefined) {
        params.set("id", what.like);
        return this.call(`/similar?${params}`);
      }
      const form = new FormData();
      form.append("file", what.file);
      return this.call(`/similar?${params}`, { method: "POST", body: form });
    });
  }
}

// Pages of results: each page asks for PAGE_SIZE more, sending the previous page's next_cursor (an upload
// is sent again with it). The server's pages never overlap and reach 1,000 results deep; the last page has
// no next_cursor. Callers only see {hits, index, done}.
export class Pager {
  constructor(request) {
    this.request = request;
    this.cursor = null;
    this.done = false;
  }

  async next() {
    const out = await this.request(this.cursor);
    this.cursor = out.next_cursor || null;
    this.done = this.cursor === null;
    return { hits: out.hits, index: out.index, done: this.done };
  }
}

export function searchParams(filters, topK) {
  const params = new URLSearchParams({ top_k: String(topK) });
  if (filters.min_score !== "") params.set("min_score", filters.min_score);
  if (filters.source) params.set("source", filters.source);
  for (const [key, value] of filters.metadata) params.append(`filter.${key}`, value);
  return params;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: a proxy's page, say
  }
  return `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
}
