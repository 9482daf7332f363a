// The clipdex page: search by words or by example, browse the results, open one, watch the index's health.
//
//   URL (?query= | ?like=<item id> | ?image=<key>, and source=, min_score=, filter.<key>=)
//     ⇄ state ─▶ api.pages() ─▶ grid of hits ─▶ thumbnails (fetched with the token, shown as blob: URLs)
//
// Ids, uris and metadata come from strangers: every element is built with el() (dom.js), from text.

import { Api, ApiError } from "./api.js";
import { count, el, label, showBlob, when } from "./dom.js";
import { Health } from "./health.js";
import { Thumbs } from "./thumbs.js";

const $ = (id) => document.getElementById(id);
const ui = {
  search: $("search"), q: $("q"), pick: $("pick"), file: $("file"),
  filtersToggle: $("filters-toggle"), filterCount: $("filter-count"), filters: $("filters"),
  source: $("f-source"), meta: $("f-meta"), metaAdd: $("f-meta-add"), metaList: $("f-meta-list"),
  min: $("f-min"), clear: $("f-clear"),
  context: $("context"), summary: $("summary"), error: $("error"), empty: $("empty"), none: $("none"),
  results: $("results"), more: $("more"),
  detail: $("detail"), detailTitle: $("detail-title"), detailClose: $("detail-close"), detailImg: $("detail-img"),
  detailSimilar: $("detail-similar"), detailFacts: $("detail-facts"), detailMeta: $("detail-meta"),
  drop: $("drop"),
  tokenDialog: $("token-dialog"), tokenForm: $("token-form"), tokenInput: $("token-input"), tokenError: $("token-error"),
  deadDialog: $("dead-dialog"),
};

// -- small helpers ----------------------------------------------------------------------------------------

function isTyping(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

const dialogOpen = () => ui.tokenDialog.open || ui.deadDialog.open;

// -- the token prompt -------------------------------------------------------------------------------------

function askToken(message, verify) {
  return new Promise((resolve) => {
    ui.tokenError.textContent = message;
    ui.tokenInput.value = "";
    if (!ui.tokenDialog.open) ui.tokenDialog.showModal();
    ui.tokenInput.focus();
    ui.tokenForm.onsubmit = async (event) => {
      event.preventDefault();
      const token = ui.tokenInput.value.trim();
      if (!token) return;
      ui.tokenError.textContent = "Checking…";
      try {
        if (await verify(token)) {
          ui.tokenError.textContent = "";
          ui.tokenDialog.close();
          resolve();
          return;
        }
        ui.tokenError.textContent = "The server refused that token. Check it (no spaces around it) and try again.";
      } catch (err) {
        ui.tokenError.textContent = err.message;
      }
      ui.tokenInput.select();
    };
  });
}
// Nothing on the page works without the token: Esc does not dismiss the prompt.
ui.tokenDialog.addEventListener("cancel", (event) => event.preventDefault());

const api = new Api(askToken);
const thumbs = new Thumbs(api);
const health = new Health(api);

// -- state and the URL ------------------------------------------------------------------------------------

// Images searched by example stay in this tab's memory; the URL names them by a key, so Back works.
const images = new Map();

function blankState(filters = { source: "", min_score: "", metadata: [] }) {
  return { query: "", like: "", imageKey: "", filters };
}

function stateFromUrl() {
  const params = new URLSearchParams(location.search);
  const state = blankState();
  state.query = params.get("query") || "";
  state.like = state.query ? "" : params.get("like") || "";
  state.imageKey = state.query || state.like ? "" : params.get("image") || "";
  state.filters.source = params.get("source") || "";
  state.filters.min_score = params.get("min_score") || "";
  for (const [key, value] of params) {
    if (key.startsWith("filter.") && key.length > 7) state.filters.metadata.push([key.slice(7), value]);
  }
  return state;
}

function urlOf(state) {
  const params = new URLSearchParams();
  if (state.query) params.set("query", state.query);
  else if (state.like) params.set("like", state.like);
  else if (state.imageKey) params.set("image", state.imageKey);
  if (state.filters.source) params.set("source", state.filters.source);
  if (state.filters.min_score !== "") params.set("min_score", state.filters.min_score);
  for (const [key, value] of state.filters.metadata) params.append(`filter.${key}`, value);
  const query = params.toString();
  return query ? `${location.pathname}?${query}` : location.pathname;
}

let state = stateFromUrl();

function go(next, { replace = false } = {}) {
  state = next;
  const url = urlOf(state);
  if (replace || url === location.pathname + location.search) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  showControls();
  run();
}

window.addEventListener("popstate", () => {
  state = stateFromUrl();
  showControls();
  run();
});

// -- running a search -------------------------------------------------------------------------------------

let generation = 0;
let pager = null;
let shown = 0;

function what() {
  if (state.query) return { query: state.query };
  if (state.like) return { like: state.like };
  if (state.imageKey && images.has(state.imageKey)) return { file: images.get(state.imageKey) };
  return null;
}

async function run() {
  const gen = ++generation;
  closeDetail({ restoreFocus: false });
  thumbs.reset();
  ui.results.replaceChildren();
  ui.more.hidden = true;
  ui.none.hidden = true;
  shown = 0;
  hideError();
  showContext();
  const search = what();
  ui.empty.hidden = search !== null;
  if (search === null) {
    document.title = "clipdex";
    ui.summary.textContent = "";
    if (state.imageKey) {
      showError("That search by image was not kept (the page was reloaded): drop or choose the image again.");
    }
    return;
  }
  document.title = `${state.query || (state.like ? `like ${state.like}` : "by image")} · clipdex`;
  performance.clearMarks("clipdex:search");
  performance.clearMeasures("clipdex:first-row");
  performance.mark("clipdex:search");
  ui.summary.textContent = "Searching…";
  ui.results.setAttribute("aria-busy", "true");
  pager = api.pages(search, state.filters);
  await nextPage(gen);
}

async function nextPage(gen) {
  ui.more.disabled = true;
  try {
    const page = await pager.next();
    if (gen !== generation) return;
    const first = shown === 0;
    const settled = showHits(page.hits);
    if (first) thumbs.startVisible([...ui.results.querySelectorAll("img")]);
    shown += page.hits.length;
    ui.more.hidden = page.done;
    ui.summary.textContent = summary(page.index);
    if (first && shown === 0) showNone(page.index);
    if (first) firstRowPainted(settled, gen);
  } catch (err) {
    if (gen === generation) showError(err);
  } finally {
    if (gen === generation) {
      ui.more.disabled = false;
      ui.results.removeAttribute("aria-busy");
    }
  }
}

function summary(index) {
  const of = `of ${count(index.items, "indexed image")}`;
  const results = shown ? count(shown, "result") : "No results";
  if (state.query) return `${results} for “${state.query}”, best first (${of})`;
  if (state.like) return `${results} like ${state.like}, best first (${of})`;
  return `${results} like your image, best first (${of})`;
}

function filtersActive() {
  const f = state.filters;
  return Boolean(f.source || f.min_score !== "" || f.metadata.length);
}

function showNone(index) {
  ui.none.hidden = false;
  if (index.items === 0) {
    ui.none.replaceChildren(
      el("h2", {}, "Nothing is indexed yet"),
      el("p", {}, "Add images to the watched folder (clipdex run DIR) or publish catalog events: they appear here within seconds."),
    );
  } else if (filtersActive()) {
    ui.none.replaceChildren(
      el("h2", {}, "No images match these filters"),
      el("p", {}, "Remove a filter or lower the minimum score, then search again."),
    );
  } else {
    ui.none.replaceChildren(el("h2", {}, "No images match"), el("p", {}, "Try other words, or search with an example image."));
  }
}

function showError(err) {
  ui.error.hidden = false;
  ui.results.removeAttribute("aria-busy");
  if (err instanceof ApiError) ui.error.textContent = err.message;
  else if (typeof err === "string") ui.error.textContent = err;
  else ui.error.textContent = `Something went wrong in this page: ${err && err.message ? err.message : err}`;
  if (ui.summary.textContent === "Searching…") ui.summary.textContent = "";
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// The time from Enter to the first row of thumbnails on screen, as a performance measure
// ("clipdex:first-row") that the browser tests and the developer tools can read.
async function firstRowPainted(settled, gen) {
  const items = [...ui.results.children];
  if (!items.length) return;
  const top = items[0].offsetTop;
  const row = items.filter((item) => item.offsetTop === top).length;
  await Promise.all(settled.slice(0, row));
  if (gen !== generation) return;
  requestAnimationFrame(() => requestAnimationFrame(() => {
    if (gen === generation) performance.measure("clipdex:first-row", "clipdex:search");
  }));
}

ui.more.addEventListener("click", () => nextPage(generation));

// -- the grid ---------------------------------------------------------------------------------------------

const hitsById = new Map();

function showHits(hits) {
  const settled = [];
  for (const hit of hits) {
    hitsById.set(hit.id, hit);
    const name = label(hit);
    const score = hit.score.toFixed(3);
    const img = el("img", { alt: name, width: 256, height: 256, decoding: "async" });
    const button = el(
      "button",
      { type: "button", class: "hit-button", tabIndex: -1, "aria-label": `${name}, score ${score}` },
      el("span", { class: "thumb" }, img),
      el("span", { class: "hit-info", "aria-hidden": "true" }, el("span", { class: "hit-name" }, name), el("span", { class: "score" }, score)),
    );
    button.addEventListener("click", () => openDetail(hit, button));
    ui.results.append(el("li", { class: "hit", dataset: { itemId: hit.id } }, button));
    settled.push(thumbs.observe(img, hit.id));
  }
  const buttons = hitButtons();
  if (buttons.length && !buttons.some((b) => b.tabIndex === 0)) buttons[0].tabIndex = 0;
  return settled;
}

const hitButtons = () => [...ui.results.querySelectorAll(".hit-button")];

function columns() {
  const items = [...ui.results.children];
  const top = items.length ? items[0].offsetTop : 0;
  return Math.max(1, items.filter((item) => item.offsetTop === top).length);
}

function focusHit(buttons, index) {
  for (const b of buttons) b.tabIndex = -1;
  const button = buttons[index];
  button.tabIndex = 0;
  button.focus();
  button.scrollIntoView({ block: "nearest" });
  if (!ui.detail.hidden) openDetail(hitsById.get(button.parentElement.dataset.itemId), button, { focus: false });
}

ui.results.addEventListener("keydown", (event) => {
  const buttons = hitButtons();
  const i = buttons.indexOf(document.activeElement);
  if (i < 0 || event.altKey || event.ctrlKey || event.metaKey) return;
  const moves = {
    ArrowRight: i + 1, ArrowLeft: i - 1, ArrowDown: i + columns(), ArrowUp: i - columns(),
    Home: 0, End: buttons.length - 1,
  };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const j = moves[event.key];
  if (j >= 0 && j < buttons.length) focusHit(buttons, j);
});

ui.results.addEventListener("focusin", (event) => {
  if (!event.target.classList.contains("hit-button")) return;
  for (const b of hitButtons()) b.tabIndex = b === event.target ? 0 : -1;
});

// -- the detail panel -------------------------------------------------------------------------------------

let detail = { id: null, from: null };

async function openDetail(hit, from, { focus = true } = {}) {
  closeDetail({ restoreFocus: false });
  detail = { id: hit.id, from };
  for (const li of ui.results.querySelectorAll(".hit.open")) li.classList.remove("open");
  from.parentElement.classList.add("open");
  ui.detail.hidden = false;
  document.body.classList.add("with-detail");
  ui.detailTitle.textContent = label(hit);
  ui.detailImg.alt = label(hit);
  ui.detailImg.removeAttribute("src");
  facts(ui.detailFacts, [["Score", hit.score.toFixed(4)], ["ID", hit.id, "code"], ["URI", hit.uri, "code"]]);
  facts(ui.detailMeta, Object.entries(hit.metadata || {}).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]));
  if (!Object.keys(hit.metadata || {}).length) ui.detailMeta.replaceChildren(el("p", { class: "muted" }, "none"));
  if (focus) ui.detail.focus();
  const id = hit.id;
  api.thumbnail(id).then((blob) => detail.id === id && showBlob(ui.detailImg, blob)).catch(() => {});
  try {
    const item = await api.item(id);
    if (detail.id !== id) return;
    facts(ui.detailFacts, [
      ["Score", hit.score.toFixed(4)], ["ID", item.id, "code"], ["URI", item.uri, "code"],
      ["Source", item.source], ["Status", item.reason ? `${item.status}: ${item.reason}` : item.status],
      ["Indexed", item.created_at, "time"], ["Updated", item.updated_at, "time"],
      ["Content hash", item.sha256 ? `sha256:${item.sha256}` : "-", "code"],
      ...(item.version === null ? [] : [["Version", String(item.version)]]),
    ]);
  } catch (err) {
    if (detail.id === id) ui.detailFacts.append(el("p", { class: "error-text" }, err.message));
  }
}

function facts(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([name, value, kind]) => [
    el("dt", {}, name),
    el("dd", {}, kind === "code" ? el("code", {}, value) : kind === "time" ? when(value) : value),
  ]));
}

function closeDetail({ restoreFocus = true } = {}) {
  if (ui.detail.hidden) return;
  ui.detail.hidden = true;
  document.body.classList.remove("with-detail");
  const from = detail.from;
  from?.parentElement?.classList.remove("open");
  detail = { id: null, from: null };
  if (restoreFocus && from?.isConnected) from.focus();
}

ui.detailClose.addEventListener("click", () => closeDetail());
ui.detailSimilar.addEventListener("click", () => {
  if (detail.id) go({ ...blankState(state.filters), like: detail.id });
});

// -- what the results are of ------------------------------------------------------------------------------

function showContext() {
  const search = what();
  if (!search || search.query !== undefined) {
    ui.context.hidden = true;
    ui.context.replaceChildren();
    return;
  }
  const img = el("img", { alt: "", width: 48, height: 48 });
  const text = search.like !== undefined
    ? el("span", {}, "Images like ", el("code", {}, search.like))
    : el("span", {}, "Images like your image ", el("span", { class: "muted" }, `(${search.file.name || "pasted"})`));
  const clear = el("button", { type: "button", class: "link" }, "Clear");
  clear.addEventListener("click", () => go(blankState(state.filters)));
  ui.context.replaceChildren(el("span", { class: "context-thumb" }, img), text, clear);
  ui.context.hidden = false;
  const image = search.file ? Promise.resolve(search.file) : api.thumbnail(search.like);
  image.then((blob) => showBlob(img, blob)).catch(() => {});
}

// -- searching by words or by example ---------------------------------------------------------------------

ui.search.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = ui.q.value.trim();
  if (!query) {
    showError("Type what you are looking for first, e.g. a red bicycle.");
    return;
  }
  go({ ...blankState(state.filters), query });
});

function searchByImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type}); choose a JPEG, PNG, WebP, GIF, BMP or TIFF file.`);
    return;
  }
  const key = Math.random().toString(36).slice(2, 10);
  images.set(key, file);
  while (images.size > 20) images.delete(images.keys().next().value);
  ui.q.value = "";
  go({ ...blankState(state.filters), imageKey: key });
}

ui.pick.addEventListener("click", () => ui.file.click());
ui.file.addEventListener("change", () => {
  searchByImage(ui.file.files[0]);
  ui.file.value = "";
});

let dragDepth = 0;
const dragsFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
document.addEventListener("dragenter", (event) => {
  if (!dragsFiles(event)) return;
  dragDepth += 1;
  ui.drop.hidden = false;
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.drop.hidden = true;
});
document.addEventListener("dragover", (event) => {
  if (dragsFiles(event)) event.preventDefault();
});
document.addEventListener("drop", (event) => {
  if (!dragsFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  ui.drop.hidden = true;
  searchByImage(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return;
  event.preventDefault();
  searchByImage(item.getAsFile());
});

// -- filters ----------------------------------------------------------------------------------------------

function showControls() {
  ui.q.value = state.query;
  const f = state.filters;
  if (![...ui.source.options].some((o) => o.value === f.source)) ui.source.append(el("option", { value: f.source }, f.source));
  ui.source.value = f.source;
  ui.min.value = f.min_score;
  ui.metaList.replaceChildren(...f.metadata.map(([key, value], i) => {
    const remove = el("button", { type: "button", class: "icon small", "aria-label": `Remove filter ${key}=${value}` }, "×");
    remove.addEventListener("click", () => {
      const metadata = f.metadata.filter((_, j) => j !== i);
      setFilters({ ...f, metadata });
    });
    return el("li", { class: "chip" }, el("span", {}, `${key} = ${value}`), remove);
  }));
  const active = (f.source ? 1 : 0) + (f.min_score !== "" ? 1 : 0) + f.metadata.length;
  ui.filterCount.hidden = active === 0;
  ui.filterCount.textContent = String(active);
  if (active && ui.filters.hidden) toggleFilters(true);
}

function toggleFilters(open = ui.filters.hidden) {
  ui.filters.hidden = !open;
  ui.filtersToggle.setAttribute("aria-expanded", String(open));
}

function setFilters(filters) {
  // Without a search there is nothing to run again: the URL just remembers the filters.
  go({ ...state, filters }, { replace: what() === null });
}

ui.filtersToggle.addEventListener("click", () => toggleFilters());
ui.filters.addEventListener("submit", (event) => event.preventDefault());
ui.source.addEventListener("change", () => setFilters({ ...state.filters, source: ui.source.value }));
ui.min.addEventListener("keydown", (event) => {
  if (event.key === "Enter") ui.min.dispatchEvent(new Event("change"));
});
ui.min.addEventListener("change", () => {
  const raw = ui.min.value.trim();
  if (raw !== "" && !(Number(raw) >= -1 && Number(raw) <= 1)) {
    showError("The minimum score is a similarity between -1 and 1 (0.2 to 0.3 is a typical cut); leave it empty for none.");
    return;
  }
  setFilters({ ...state.filters, min_score: raw });
});

function addMetaFilter() {
  const raw = ui.meta.value.trim();
  const at = raw.indexOf("=");
  if (at <= 0) {
    showError("Write a metadata filter as key=value, e.g. category=shoes.");
    return;
  }
  ui.meta.value = "";
  const pair = [raw.slice(0, at).trim(), raw.slice(at + 1).trim()];
  setFilters({ ...state.filters, metadata: [...state.filters.metadata, pair] });
  ui.meta.focus();
}
ui.metaAdd.addEventListener("click", addMetaFilter);
ui.meta.addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    addMetaFilter();
  }
});
ui.clear.addEventListener("click", () => setFilters({ source: "", min_score: "", metadata: [] }));

// -- index health and dead letters ------------------------------------------------------------------------

// -- keys -------------------------------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if (dialogOpen() || event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === "/" && !isTyping(event.target)) {
    event.preventDefault();
    ui.q.focus();
    ui.q.select();
  } else if (event.key === "Escape" && !ui.detail.hidden) {
    event.preventDefault();
    closeDetail();
  } else if (event.key === "ArrowDown" && event.target === ui.q && ui.results.children.length) {
    event.preventDefault();
    focusHit(hitButtons(), 0);
  }
});

// -- start ------------------------------------------------------------------------------------------------

// The detail panel sticks below the header, whose height changes with the window and the filters.
const header = document.querySelector("header.top");
new ResizeObserver(() => {
  document.documentElement.style.setProperty("--header-h", `${header.offsetHeight}px`);
}).observe(header);

showControls();
history.replaceState(null, "", urlOf(state));
run();
health.refresh();
