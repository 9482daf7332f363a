// The index's health strip (items, delta, lag, dead letters, the model answering, a re-embed's progress),
// refreshed every few seconds, and the read-only dead-letters view it opens.

import { count, el, when } from "./dom.js";

const EVERY_MS = 10_000;
const DEAD_LETTERS_SHOWN = 100;

const $ = (id) => document.getElementById(id);

export class Health {
  constructor(api) {
    this.api = api;
    this.strip = $("health");
    this.text = $("health-text");
    this.emptyIndex = $("empty-index");
    this.dialog = $("dead-dialog");
    this.rows = this.dialog.querySelector("tbody");
    this.note = $("dead-note");
    this.timer = 0;
    $("dead-close").addEventListener("click", () => this.dialog.close());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) this.refresh();
    });
  }

  async refresh() {
    clearTimeout(this.timer);
    try {
      this.show(await this.api.status());
    } catch (err) {
      this.strip.dataset.state = "down";
      this.text.replaceChildren(el("span", {}, err.message));
    }
    this.timer = setTimeout(() => this.refresh(), document.hidden ? 6 * EVERY_MS : EVERY_MS);
  }

  show(st) {
    this.emptyIndex.hidden = st.items !== 0;
    const pending = st.pending_changes > 0;
    this.strip.dataset.state = st.dead_letters > 0 || pending ? "warn" : "ok";
    // lag_s: from event to durable, while a running indexer is behind (0 once it has caught up, null when
    // none runs); pending_changes: what this server has yet to pick up from the store
    const behind = typeof st.lag_s === "number" && st.lag_s > 0;
    const lag = behind
      ? `lag ${Number(st.lag_s).toFixed(1)} s`
      : pending ? `${count(st.pending_changes, "change")} not yet searchable` : "up to date";
    const dead = el("button", { type: "button", class: "link" }, count(st.dead_letters, "dead letter"));
    dead.addEventListener("click", () => this.openDeadLetters());
    const part = (text, title) => el("span", { class: "part", title }, text);
    const model = st.answering_model || st.model;
    const parts = [
      part(count(st.items, "item"), `${count(st.failed, "item")} could not be indexed`),
      part(`delta ${st.delta_size.toLocaleString()}`, `vectors not yet compacted into the main index (generation ${st.generation})`),
      part(lag, `this server last read new vectors ${st.refreshed_seconds_ago} s ago`),
      part(el("span", {}, "newest ", when(st.newest_indexed_at))),
      el("span", { class: "part" }, dead),
      part(`model ${model.name}`, `${model.name} / ${model.pretrained}, ${model.dim} dimensions: it answers searches`),
    ];
    if (st.reembed) parts.push(part(reembedText(st.reembed), reembedTitle(st.reembed)));
    this.text.replaceChildren(...parts);
  }

  async openDeadLetters() {
    this.rows.replaceChildren(this.row(el("td", { colSpan: 5, class: "muted" }, "Loading…")));
    this.note.textContent = "";
    this.dialog.showModal();
    $("dead-close").focus();
    try {
      const { dead_letters: letters } = await this.api.deadLetters(DEAD_LETTERS_SHOWN);
      this.rows.replaceChildren(...letters.map((d) => this.row(
        el("td", {}, String(d.id)),
        el("td", {}, d.item_id ? el("code", {}, d.item_id) : el("span", { class: "muted" }, `(${d.source})`)),
        el("td", { class: "reason" }, d.reason),
        el("td", {}, when(d.at)),
        el("td", {}, String(d.tries)),
      )));
      if (!letters.length) {
        this.rows.replaceChildren(this.row(el("td", { colSpan: 5 }, "No dead letters: everything so far was indexed.")));
      }
      if (letters.length === DEAD_LETTERS_SHOWN) {
        this.note.textContent = `The newest ${DEAD_LETTERS_SHOWN}; clipdex dlq list on the server shows them all.`;
      }
    } catch (err) {
      this.rows.replaceChildren(this.row(el("td", { colSpan: 5, class: "error-text" }, err.message)));
    }
  }

  row(...cells) {
    return el("tr", {}, ...cells);
  }
}

// clipdex reembed: the store moves to another model; search keeps answering with the current one until then
function reembedText(re) {
  const pct = re.total ? Math.floor((100 * re.done) / re.total) : 100;
  const eta = re.state === "running" && typeof re.eta_s === "number" ? `, ${duration(re.eta_s)} left` : "";
  return `re-embedding with ${re.model.name}: ${pct}%${re.state === "running" ? eta : ", paused"}`;
}

function reembedTitle(re) {
  const failed = re.failed ? `, ${count(re.failed, "item")} whose source is gone` : "";
  const rate = re.state === "running" ? ` at ${re.rate.toFixed(1)} items/s` : " (no process runs it now)";
  return `${re.done.toLocaleString()} of ${re.total.toLocaleString()} items${failed}${rate}; the switch comes when all are done`;
}

function duration(seconds) {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
