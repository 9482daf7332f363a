// The index's health strip (items, delta, lag, dead letters, model), refreshed every few seconds, and
// the read-only dead-letters view it opens.

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
    this.text.replaceChildren(
      part(count(st.items, "item"), `${count(st.failed, "item")} could not be indexed`),
      part(`delta ${st.delta_size.toLocaleString()}`, `vectors not yet compacted into the main index (generation ${st.generation})`),
      part(lag, `this server last read new vectors ${st.refreshed_seconds_ago} s ago`),
      part(el("span", {}, "newest ", when(st.newest_indexed_at))),
      el("span", { class: "part" }, dead),
      part(`model ${st.model.name}`, `${st.model.name} / ${st.model.pretrained}, ${st.model.dim} dimensions`),
    );
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
