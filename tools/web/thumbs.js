// Thumbnails load when they come near the screen, a few at a time, through the API (so with the token),
// and are shown through blob: URLs: the token is never in an image URL.

import { el, showBlob } from "./dom.js";

const AT_ONCE = 6; // a browser opens at most 6 HTTP/1.1 connections to one server
const MARGIN_PX = 400;

export class Thumbs {
  constructor(api) {
    this.api = api;
    this.waiting = [];
    this.running = 0;
    this.abort = new AbortController();
    this.observer = new IntersectionObserver((entries) => this.seen(entries), { rootMargin: `${MARGIN_PX}px 0px` });
    this.jobs = new WeakMap();
  }

  // Load item `id`'s thumbnail into `img` once it is near the screen; resolves when it is shown or failed.
  observe(img, id) {
    return new Promise((resolve) => {
      this.jobs.set(img, { id, resolve });
      this.observer.observe(img);
    });
  }

  // Start on the ones already on screen now, instead of a frame or two later when the observer reports
  // them: that is most of the time to the first row of a new search.
  startVisible(imgs) {
    const below = window.innerHeight + MARGIN_PX;
    this.take(imgs.filter((img) => img.getBoundingClientRect().top < below));
  }

  seen(entries) {
    this.take(entries.filter((entry) => entry.isIntersecting).map((entry) => entry.target));
  }

  take(imgs) {
    for (const img of imgs) {
      this.observer.unobserve(img);
      const job = this.jobs.get(img);
      if (job && !job.taken) {
        job.taken = true;
        this.waiting.push(img);
      }
    }
    this.pump();
  }

  pump() {
    while (this.running < AT_ONCE && this.waiting.length) {
      const img = this.waiting.shift();
      this.running += 1;
      this.load(img, this.abort.signal).finally(() => {
        this.running -= 1;
        this.pump();
      });
    }
  }

  async load(img, signal) {
    const job = this.jobs.get(img);
    const thumb = img.parentElement;
    try {
      await showBlob(img, await this.api.thumbnail(job.id, signal));
      thumb.classList.add("loaded");
    } catch (err) {
      if (err.name === "AbortError") return;
      thumb.classList.add("broken");
      thumb.append(el("span", { class: "no-preview" }, "no preview"));
      img.title = err.message;
    } finally {
      job.resolve();
    }
  }

  // A new search: drop what is queued or loading for the old one.
  reset() {
    this.abort.abort();
    this.abort = new AbortController();
    this.observer.disconnect();
    for (const img of this.waiting) this.jobs.get(img)?.resolve();
    this.waiting = [];
  }
}
